"""Every example of docs/training.md runs (the PyTorch block, torch not being installed, is only
compiled), and the encoding model it fits is the ridge solution of the eagerly loaded data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_training_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.mkdtemp", lambda *a, **k: str(tmp_path))
    blocks = python_blocks(DOC.read_text())
    assert blocks[0].startswith("# setup")
    namespace: dict = {}
    for block in blocks:
        code = compile(block, str(DOC), "exec")
        if block.startswith("# With PyTorch"):
            continue  # needs torch: compiled, not run
        exec(code, namespace)
    # the oracle: the same ridge fit on the eagerly loaded training trials
    train = namespace["train"].compute()
    keep = train.embedding_valid.values
    x = np.c_[train.embedding.values[keep].astype(np.float64), np.ones(keep.sum())]
    y = train.betas.values[keep].astype(np.float64)
    fit = np.isfinite(y).all(axis=0)
    alpha = namespace["alpha"]
    expected = np.linalg.solve(x.T @ x + alpha * np.eye(x.shape[1]), x.T @ y[:, fit])
    weights = namespace["weights"]
    np.testing.assert_allclose(weights[:, fit], expected, rtol=1e-6, atol=1e-9)
    assert np.isnan(weights[:, ~fit]).all()
    r = namespace["r"]
    assert np.isfinite(r[fit]).all() and np.all(np.abs(r[fit]) <= 1 + 1e-9)
    # the split kept every shared image on the test side
    assert set(namespace["test"].unique_or_shared.values.tolist()) == {"shared"}
