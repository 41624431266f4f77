"""Imports point down the layers (README: datasets -> ops -> catalog -> sources -> storage)."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_pushdown_and_direct_load_work_without_the_nifti_reader():
    """The graph optimization and the direct loader are below the reader: they never import it.

    The reader registers its array type and its whole-array reads with them;
    using them (here: optimizing a plain Dask graph) pulls nothing of it in.
    """
    code = (
        "import sys, dask.array as da; "
        "from neurocube.sources import pushdown, nifti_load; "
        "x = da.ones(10, chunks=5)[2:7]; "
        "pushdown.optimize(x.__dask_graph__(), x.__dask_keys__()); "
        "print(nifti_load.direct_load(x), 'neurocube.sources.nifti' in sys.modules)"
    )
    assert _run(code) == "None False"
