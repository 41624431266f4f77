"""Shared test fixtures (fixture plugins live in tests/fixtures/)."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures.nifti", "tests.fixtures.remote"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own neurocube cache folder; nothing touches ~/.cache."""
    monkeypatch.setenv("NEUROCUBE_CACHE_DIR", str(tmp_path_factory.mktemp("nc-cache")))
    monkeypatch.setenv("NEUROCUBE_PROGRESS", "0")
