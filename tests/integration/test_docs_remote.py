"""Every example of docs/remote.md runs, against a real S3 server on loopback.

The examples name the public bucket; here the setup block's ``BUCKET``, ``OPTIONS`` and
``INDEX_STORE`` are pointed at a generated bucket on the loopback server (no traffic leaves the
machine). The Colab block names the public bucket literally and is only checked to compile.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from neurocube.synthetic.bucket import make_bucket

DOC = Path(__file__).resolve().parents[2] / "docs" / "remote.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_remote_doc_examples_run(s3, tmp_path):
    make_bucket(tmp_path / "bucket", subjects=1, sessions=2, trials=12, grid=(8, 9, 7))
    root = s3.put(tmp_path / "bucket", "laion")
    blocks = python_blocks(DOC.read_text())
    assert blocks[0].startswith("# setup")
    namespace: dict = {}
    for block in blocks:
        code = compile(block, str(DOC), "exec")
        if block.startswith("# On Colab"):
            continue  # names the public bucket: compiled, not run
        exec(code, namespace)
        if block.startswith("# setup"):
            namespace.update(BUCKET=root, OPTIONS=s3.storage_options,
                             INDEX_STORE=f"s3://{s3.name}/indexes")
    assert namespace["first_five"].shape[0] == 5
    assert np.isfinite(namespace["one"].data.values).any()
    assert namespace["ds"].attrs["subject"] == "sub-01"
