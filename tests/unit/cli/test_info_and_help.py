"""`neurocube info`, `neurocube index build` with several paths, and plain help with defaults.

Issue 12, item 6 (the `cache` subcommands belong to the cache's own tests).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from neurocube.cli import build_parser, main

DATA = Path(__file__).resolve().parents[2] / "data"


def _nifti(path, shape=(6, 7, 5, 9)):
    values = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    nib.save(nib.Nifti1Image(values, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def test_info_on_a_nifti_says_format_dims_chunks_and_index(tmp_path, capsys):
    path = _nifti(tmp_path / "betas.nii.gz")
    cache = tmp_path / "cache"
    assert main(["info", str(path), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "format: nifti" in out
    assert "dims: x=6, y=7, z=5, trial=9" in out
    assert "variable data('x', 'y', 'z', 'trial'): float32, shape (6, 7, 5, 9)" in out
    assert "chunks (6, 7, 5, " in out
    assert "gzip index: none yet" in out
    # after an index build, info finds the index (several paths in one call)
    other = _nifti(tmp_path / "other.nii.gz", (4, 4, 4, 3))
    plain = _nifti(tmp_path / "plain.nii", (4, 4, 4, 3))
    code = main(["index", "build", str(path), str(other), str(plain), "--cache-dir", str(cache),
                 "--no-progress"])
    assert code == 0
    built = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in built] == [str(path), str(other), str(plain)]
    assert "no index needed" in built[2]
    assert main(["info", str(path), str(plain), "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "gzip index: yes" in out and "gzip index: not needed" in out


@pytest.mark.parametrize(
    ("relative", "fmt", "dims"),
    [
        ("spectralbrain/sub-01_lh_white_spectral.h5", "spectral", "mode=5"),
        ("offspect/merged.hdf5", "TMS traces", "trace=4"),
        ("spectralbrain/sub-01_arrays.npz", "NPZ arrays", "vertices_dim_0=12"),
        ("spectralbrain/sub-01_hks.func.gii", "GIFTI", "vertex=12, map=3"),
        ("spectralbrain/sub-01_conn.tsv", "connectome", "source=3, target=3"),
        ("coco_pipe/eeg_foundation_embeddings/combined/cbramod_EO_epoch_embeddings.parquet",
         "parquet", "epoch=12, feature=4"),
    ],
)
def test_info_knows_every_format(relative, fmt, dims, capsys):
    assert main(["info", str(DATA / relative)]) == 0
    out = capsys.readouterr().out
    assert f"format: {fmt}" in out and dims in out and "file size:" in out


def test_info_on_something_unknown_is_one_line_and_status_1(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello\n")
    assert main(["info", str(path), str(tmp_path / "missing.nii")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("neurocube: error:") for line in err)
    assert "no neurocube reader recognises" in err[0]


def _subparsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def test_every_subcommand_help_is_plain_text_with_defaults():
    commands = list(_subparsers(build_parser()))
    assert {words[0] for words, _ in commands} >= {"demo", "index", "info", "cache"}
    for words, sub in commands:
        text = sub.format_help()
        assert "\x1b[" not in text and "``" not in text, words
        for action in sub._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            if action.default in (None, False, argparse.SUPPRESS):
                continue
            # an option with a default says it: "(default: X)", or its help names the default
            shown = " ".join(text.split())
            said = "default" in (action.help or "").lower()
            assert said or f"(default: {action.default})" in shown, (words, action.dest)


def test_help_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "neurocube.cli", "info", "--help"],
                          capture_output=True, text=True, check=True, timeout=60)
    assert "usage: neurocube info" in proc.stdout and "default:" in proc.stdout
