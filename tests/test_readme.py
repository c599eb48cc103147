"""The README's examples run as written, in order, on a fresh copy of the repository."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A block the test leaves out says why on the line before it, in the README itself.
SKIP = r"<!-- not run by tests/test_readme\.py: (?P<reason>[^\n]+?) -->\n"
BLOCK = re.compile(rf"(?:{SKIP})?```bash\n(?P<code>.*?)```", re.S)
STEPS = re.compile(r"--steps (\d+)")
STEPS_PER_TEST_STEP = 200  # what the README's "Examples in tests" line says


def examples(readme: str) -> list[tuple[str, str | None]]:
    """Each bash block, in order, with the reason it is not run (None: it is run)."""
    return [(m["code"], m["reason"]) for m in BLOCK.finditer(readme)]


def fewer_steps(code: str) -> str:
    """`--steps N` cut to N / 200 rounded up (order kept: a resume still asks for more)."""
    return STEPS.sub(lambda m: f"--steps {math.ceil(int(m[1]) / STEPS_PER_TEST_STEP)}", code)


def test_every_block_is_run_or_says_why_not():
    readme = (ROOT / "README.md").read_text()
    found = examples(readme)
    assert len(found) == readme.count("```bash")
    assert sum(reason is not None for _, reason in found) == readme.count("<!-- not run by")
    assert sum(reason is None for _, reason in found) >= 7
    assert f"each `--steps N` cut to N/{STEPS_PER_TEST_STEP}" in readme
    cut = fewer_steps("--steps 100 x --steps 1200\n--steps 2")
    assert cut == "--steps 1 x --steps 6\n--steps 1"


def fresh_copy(dest: Path) -> Path:
    """The repository's tracked files in `dest`, staged in a new git repo (so that the files
    the examples leave can be listed)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    return dest


@pytest.mark.slow
def test_readme_examples_run_in_order_on_a_fresh_copy(tmp_path):
    repo = fresh_copy(tmp_path / "apr")
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),  # the copy's apr_cli, whatever the venv's install points at
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    ran = 0
    for code, reason in examples((repo / "README.md").read_text()):
        if reason is not None:
            continue
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", fewer_steps(code)],
            cwd=repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{code}\nexit {proc.returncode}:\n{proc.stderr[-3000:]}"
        ran += 1
    assert ran >= 7
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    untracked = [line for line in status.stdout.splitlines() if not line.startswith("A ")]
    assert untracked == [], "the examples left files git does not ignore"
