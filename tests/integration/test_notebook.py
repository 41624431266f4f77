"""The quickstart notebook runs end to end on small generated data (as CI and Colab run it)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "quickstart.ipynb"


def test_quickstart_notebook_runs_and_plots(tmp_path, monkeypatch):
    # The kernel inherits this environment: tiny sizes, a private folder, no bars. Figures use
    # the kernel's inline backend (Agg-based, no display needed), as in Jupyter and Colab.
    monkeypatch.setenv("QUICKSTART_TRIALS", "12")
    monkeypatch.setenv("QUICKSTART_GRID", "12,14,10")
    monkeypatch.setenv("QUICKSTART_DIR", str(tmp_path))
    monkeypatch.delenv("MPLBACKEND", raising=False)
    monkeypatch.delenv("NEUROCUBE_PUBLIC_BUCKET", raising=False)  # no traffic off this machine
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    code_cells = [c for c in notebook.cells if c.cell_type == "code"]
    errors = [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert errors == []
    text = "\n".join(
        o.get("text", "") for c in code_cells for o in c.outputs if o.output_type == "stream"
    )
    assert "second call (reopen)" in text
    assert f"working in {tmp_path}" in text
    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # ROI response per image, noise-ceiling histogram, voxel map
    # The notebook cached into its own folder and cleared it at the end.
    assert (tmp_path / "bucket" / "derivatives").is_dir()
    assert "sub01-face-nc15" in text and "complete" in text  # `neurocube cache ls`
    assert "removed ['sub01-face-nc15']" in text
    assert "public bucket: skipped" in text  # the Colab cell sends nothing off this machine
