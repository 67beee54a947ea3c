"""Every command in the README runs, or says it needs cloud hardware.

- The first two commands (quickstart, tests) are what CI runs: .ci/run holds them verbatim.
- Blocks whose first line is "# needs ..." (TPU pods, SLURM, GPU nodes) cannot run here.
- Every other command is run below, verbatim except for paths: /tmp/bt_quickstart becomes a
  smoke pretraining run made by this test, other /tmp/... outputs go to a temporary folder.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest
from e2e import ROOT, cpu_env, run_main

README = pathlib.Path(ROOT, "README.md").read_text()
CI = pathlib.Path(ROOT, ".ci", "run").read_text()


def readme_blocks():
    """Bash blocks as lists of commands (continuation lines joined, comments dropped)."""
    blocks = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        lines = block.replace("\\\n", " ").splitlines()
        comments = [ln for ln in lines if ln.strip().startswith("#")]
        commands = [" ".join(ln.split()) for ln in lines if ln.strip() and ln not in comments]
        blocks.append((comments, commands))
    return blocks


def runnable_commands():
    commands = [cmd for comments, cmds in readme_blocks() for cmd in cmds if not _cloud(comments)]
    return commands[2:]  # the first two are CI's


def _cloud(comments) -> bool:
    return bool(comments) and comments[0].lstrip("# ").startswith("needs")


def test_ci_runs_the_first_two_commands_verbatim():
    first, second = [cmd for _, cmds in readme_blocks() for cmd in cmds][:2]
    assert "configs/quickstart.py" in first and "pytest" in second
    ci_lines = [" ".join(ln.split()) for ln in CI.splitlines()]
    assert first in ci_lines and second in ci_lines


def test_cloud_blocks_say_what_they_need():
    cloud = [comments[0] for comments, _ in readme_blocks() if _cloud(comments)]
    assert len(cloud) >= 3  # TPU pod, SLURM, multi-node GPU launches
    for line in cloud:
        assert re.search(r"TPU|SLURM|GPU", line), line


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("bt_quickstart")
    run_main(workdir, "--config.train.stop_after_steps=2")
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("command", runnable_commands())
def test_readme_command_runs(command, smoke_run, tmp_path):
    command = re.sub(r"/tmp/bt_quickstart(?![\w.])", str(smoke_run), command)
    command = re.sub(r"/tmp/(bt_[\w.]+)", lambda m: str(tmp_path / m.group(1)), command)
    argv = shlex.split(command)
    assert argv[0] == "python", "README commands run with python (or are marked # needs)"
    result = subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=ROOT,
        env=cpu_env(8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    assert os.listdir(tmp_path), "the command wrote nothing"
