"""Imports point down the layers (README: datasets -> ops -> catalog -> sources -> storage)."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest


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


@pytest.mark.parametrize("xarray_first", [False, True])
def test_open_nifti_results_have_the_accessor_without_importing_it(tmp_path, xarray_first):
    """``ds.neuro`` on an ``open_nifti`` result comes from ``import neurocube``, not the reader.

    The reader (a source, below the API) does not import ``neurocube.accessor``;
    the package's import hook registers it when xarray is imported, before or
    after the reader. The fresh process never imports the accessor itself.
    """
    path = tmp_path / "betas.nii"
    data = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    nib.Nifti1Image(data, np.eye(4)).to_filename(str(path))
    code = (
        ("import xarray; " if xarray_first else "")
        + "import numpy as np; from neurocube.sources.nifti import open_nifti; "
        + f"ds = open_nifti({str(path)!r}); "
        + "loaded = ds.neuro.load(); "
        + "print(type(loaded).__name__, callable(ds.data.neuro.to_nifti), "
        + "float(np.asarray(loaded.data).sum()))"
    )
    assert _run(code) == f"Dataset True {float(data.sum())}"


def test_the_cache_package_does_not_import_the_accessor_yet_ds_neuro_works():
    """``neurocube.caching`` sits below ``neurocube.accessor`` (which calls into it)."""
    # without neurocube's xarray import hook, importing the cache package loads no accessor
    code = (
        "import sys, neurocube; neurocube._remove_hook(); import neurocube.caching; "
        "print('neurocube.accessor' in sys.modules)"
    )
    assert _run(code) == "False"
    # with it (any normal import), ds.neuro is there all the same
    code = (
        "from neurocube.caching import cache; import xarray as xr; "
        "print(callable(xr.Dataset().neuro.cache))"
    )
    assert _run(code) == "True"
