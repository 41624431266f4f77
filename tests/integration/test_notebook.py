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
    # ROI + noise ceiling on slices, noise-ceiling histogram, image-averaged responses with their
    # correlation matrix, the map written back and re-read
    assert len(images) == 4
    assert "neurocube is installed" in text  # the install cell skips what is there
    assert "re-read map matches: yes" in text and "images shown more than once" in text
    # The notebook cached into its own folder and cleared it at the end.
    assert (tmp_path / "bucket" / "derivatives").is_dir()
    assert "sub01-face-nc15" in text and "complete" in text  # `neurocube cache ls`
    assert "removed ['sub01-face-nc15']" in text
    assert "public bucket: skipped" in text  # the Colab cell sends nothing off this machine


def _install_cell():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    cell = next(c for c in notebook.cells if c.cell_type == "code")
    assert cell.source.lstrip().startswith("# Where to install neurocube from")
    return cell.source


def test_install_cell_without_a_source_says_what_to_set_and_does_not_fail(tmp_path, monkeypatch):
    # A fresh runtime: neurocube not importable, no clone, no wheel, NEUROCUBE_REPO_URL empty.
    import importlib.util

    source = _install_cell()
    assert 'NEUROCUBE_REPO_URL = ""' in source  # one clearly named variable, no placeholder URL
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    calls = []
    monkeypatch.setattr("subprocess.run", lambda *a, **k: calls.append(a))
    printed = []
    namespace = {"print": printed.append}
    exec(compile(source, "install-cell", "exec"), namespace)
    assert calls == []
    assert "set NEUROCUBE_REPO_URL" in printed[0] and "skipped" in printed[0]


def test_install_cell_installs_from_the_url_or_a_wheel(tmp_path, monkeypatch):
    import importlib.util

    source = _install_cell().replace(
        'NEUROCUBE_REPO_URL = ""', 'NEUROCUBE_REPO_URL = "git+https://example.invalid/neurocube"'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    calls = []
    monkeypatch.setattr("subprocess.run", lambda cmd, **k: calls.append((cmd, k)))
    exec(compile(source, "install-cell", "exec"), {"print": lambda *a: None})
    (cmd, kwargs), = calls
    assert cmd[-1] == "git+https://example.invalid/neurocube" and kwargs["check"] is True
    (tmp_path / "neurocube-0.1.0-py3-none-any.whl").write_bytes(b"")
    calls.clear()
    exec(compile(_install_cell(), "install-cell", "exec"), {"print": lambda *a: None})
    (cmd, _), = calls
    assert cmd[-1].endswith("neurocube-0.1.0-py3-none-any.whl")
