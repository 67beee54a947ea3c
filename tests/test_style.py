"""The tree is ruff-clean (lint and format), and the README's test command is what CI runs."""

import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_runs_the_readme_test_command():
    readme = pathlib.Path(ROOT, "README.md").read_text()
    ci = pathlib.Path(ROOT, ".ci", "run").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_lines = [
        line.strip() for block in commands for line in block.splitlines() if "pytest" in line
    ]
    assert test_lines, "the README shows no test command"
    assert test_lines[0] in ci.splitlines(), (test_lines[0], "not in .ci/run")
