"""DEFLATE's maximum ratio: defined once, shared by the NIfTI and HDF5 checks, a true bound."""

from __future__ import annotations

import re
import subprocess
import sys
import zlib
from pathlib import Path

import neurocube
from neurocube.sources import deflate, hdf5_checks, nifti_header

SRC = Path(neurocube.__file__).parent


def test_the_ratio_is_defined_once():
    assignment = re.compile(r"^DEFLATE_MAX_RATIO\s*[:=]", re.MULTILINE)
    defined = sorted(
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if assignment.search(p.read_text())
    )
    assert defined == ["sources/deflate.py"]


def test_the_old_names_still_import_and_are_the_same_value():
    assert nifti_header.DEFLATE_MAX_RATIO is deflate.DEFLATE_MAX_RATIO
    assert hdf5_checks.DEFLATE_MAX_RATIO is deflate.DEFLATE_MAX_RATIO
    assert "DEFLATE_MAX_RATIO" in hdf5_checks.__all__


def test_the_module_imports_no_other_neurocube_module():
    code = (
        "import sys, neurocube.sources; before = set(sys.modules); "
        "import neurocube.sources.deflate; "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('neurocube')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['neurocube.sources.deflate']"


def test_the_ratio_bounds_what_zlib_achieves():
    # a run of one byte value is deflate's best case; zlib at level 9 comes within 1 % of the
    # bound, whatever the wrapper (raw deflate, gzip, zlib)
    n = 1 << 24
    for wbits in (-15, 31, 15):
        comp = zlib.compressobj(9, zlib.DEFLATED, wbits)
        size = len(comp.compress(bytes(n)) + comp.flush())
        assert 0.99 * deflate.DEFLATE_MAX_RATIO < n / size <= deflate.DEFLATE_MAX_RATIO
