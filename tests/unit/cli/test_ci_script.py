""".ci/run runs the README's two lines and fails when either fails.

The real install and test run cannot run inside the test suite (it would run
itself), so ``python``, ``pip``, ``neurocube`` and ``pytest`` are small shell
scripts on ``PATH`` that log their call and exit with the status asked for.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CI = ROOT / ".ci" / "run"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None, "README.md starts with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def run_ci(tmp_path: Path, **status: int) -> tuple[int, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for tool in ("python", "pip", "neurocube", "pytest"):
        script = bin_dir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\nexit {status.get(tool, 0)}\n')
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    proc = subprocess.run(["bash", str(CI)], env=env, capture_output=True, text=True)
    calls = [c.strip() for c in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, calls


def test_readme_starts_with_the_two_commands():
    assert readme_commands() == ['pip install -e ".[dev]" && neurocube demo', "pytest"]
    assert 'pip install -e ".[dev]" && neurocube demo' in CI.read_text()


def test_ci_runs_install_demo_then_tests(tmp_path):
    rc, calls = run_ci(tmp_path)
    assert rc == 0
    assert calls == ["python -m pip install --upgrade pip", "pip install -e .[dev]",
                     "neurocube demo", "pytest"]


@pytest.mark.parametrize("failing", ["pytest", "pip", "neurocube"])
def test_ci_exits_non_zero_when_a_step_fails(tmp_path, failing):
    rc, calls = run_ci(tmp_path, **{failing: 3})
    assert rc != 0
    if failing != "pytest":  # a failed install or demo does not go on to test
        assert not any(call.startswith("pytest") for call in calls)
