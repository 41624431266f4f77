"""Every example of docs/reliability.md runs, and its damaged file is refused, not read."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_reliability_doc_examples_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: str(tmp_path))
    blocks = python_blocks(DOC.read_text())
    assert blocks and blocks[0].startswith("# setup")
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    # the oracle: the undamaged file read back equals what was written
    np.testing.assert_array_equal(namespace["first"], namespace["data"])
    printed = capsys.readouterr().out.split()
    assert printed and printed[-1] in {"CorruptDataError", "FormatError", "TruncatedFileError"}


def test_every_error_in_the_table_exists():
    import neurocube.errors as errors

    table = DOC.read_text().split("## The errors, and what to do")[1].split("## Writers")[0]
    first_column = re.findall(r"^\| ([^|]+)\|", table, flags=re.MULTILINE)
    names = {n for cell in first_column for n in re.findall(r"`(\w+Error)`", cell)}
    names -= {"ValueError", "OSError", "KeyError", "TypeError", "FileNotFoundError"}
    assert names
    for name in names:
        assert issubclass(getattr(errors, name), errors.NeurocubeError), name
