"""Everyday conventions (issue 12, item 10): the accessor after `import neurocube`, doc pointers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize(
    "code",
    [
        # neurocube first: light (no xarray), then the accessor appears with xarray
        "import sys, neurocube; assert 'xarray' not in sys.modules; import xarray as xr",
        # xarray first
        "import xarray as xr, neurocube",
        # a submodule of xarray first
        "import sys, neurocube; from xarray import DataArray; xr = sys.modules['xarray']",
    ],
)
def test_import_neurocube_makes_the_accessor_available(code):
    check = (
        "; import numpy as np; da = xr.DataArray(np.arange(3.0), dims='t', "
        "attrs={'neurocube_sources': []}); "
        "print(callable(da.neuro.to_nifti), callable(xr.Dataset().neuro.cache))"
    )
    assert _run(code + check) == "True True"


def test_xarray_keeps_its_loader_and_imports_once():
    code = (
        "import neurocube, xarray, importlib.resources as r, sys; "
        "wrapper = neurocube._RegisterAfterExec; "
        "print(not isinstance(xarray.__spec__.loader, wrapper), "
        "not isinstance(xarray.__loader__, wrapper), "
        "any(type(f).__name__ == '_XarrayImportHook' for f in sys.meta_path))"
    )
    assert _run(code) == "True True False"


def test_docs_point_to_files_in_the_repository():
    pattern = re.compile(r"\b(FORMATS|DESIGN)(\.md|'s)")
    hits = []
    files = [ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(ROOT / "src").rglob("*.py")]
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "pointers to documents that are not in the repository:\n" + "\n".join(hits)
