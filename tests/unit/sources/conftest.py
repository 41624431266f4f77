"""Fixtures shared by the tests of the source readers."""

from __future__ import annotations

import pytest

from neurocube.sources import gzindex


@pytest.fixture
def fresh_gz_handles():
    """Close every pooled gzip handle and forget cached indexes before and after the test.

    Tests that rewrite, damage or replace a ``.gz`` or its index use it (as
    ``pytestmark = pytest.mark.usefixtures("fresh_gz_handles")``), so no handle or
    index bytes from another test are reused.
    """
    gzindex.reset_handles()
    yield
    gzindex.reset_handles()
